// Authentication primitives for the connection handshakes: SHA-256 (FIPS 180-4),
// HMAC-SHA256 (RFC 2104), a constant-time comparison and a secure random source.
//
// Written here rather than taken from OpenSSL so the wheel stays self-contained. They
// are used only on handshakes (a few hashes per connection), so clarity beats speed.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace ringcc::auth {

constexpr size_t kDigestBytes = 32;
using Digest = std::array<uint8_t, kDigestBytes>;

// Incremental SHA-256.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  Digest finish();  // the object must not be updated afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;  // bytes hashed so far
};

Digest sha256(const void* data, size_t n);

// Incremental HMAC-SHA256 with `key` (any length; longer than a block is hashed first).
class Hmac {
 public:
  Hmac(const void* key, size_t key_len);
  void update(const void* data, size_t n);
  template <typename T>
  void update_value(const T& v) {  // a fixed-size little-endian integer field
    update(&v, sizeof(v));
  }
  Digest finish();

 private:
  Sha256 inner_, outer_;
};

Digest hmac_sha256(const void* key, size_t key_len, const void* data, size_t n);

// Equality of two byte strings in time that depends only on `n`, not on where they differ.
bool constant_time_equal(const void* a, const void* b, size_t n);

// `n` bytes from the kernel's CSPRNG (getrandom(2), /dev/urandom where that is missing).
// Throws ringcc::Error if neither works: a predictable challenge is worse than none.
void secure_random(void* out, size_t n);

}  // namespace ringcc::auth
