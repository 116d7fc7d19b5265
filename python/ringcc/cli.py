"""The `ringcc` command line: `ringcc info`, `ringcc bench`, `ringcc train`, `ringcc ps-server`."""

from __future__ import annotations

import argparse
import platform
import sys


def _cuda_row(d: dict) -> str:
    if not d["cuda"]:
        return "no (built without CUDA kernels)"
    from ._native import _C

    archs = ", ".join(f"sm_{a}" for a in d["cuda_architectures"].split(";") if a)
    return f"kernels for {archs}; {_C._cuda_device_count()} GPU(s) visible (the GPU data path is not built yet)"


def _info(_args: argparse.Namespace) -> int:
    import ringcc

    d = ringcc.info()
    rows = [
        ("ringcc", d["version"]),
        ("python", platform.python_version()),
        ("compiler", f"{d['compiler']} ({d['build_type']})"),
        ("simd", f"{d['simd_active']} (best on this CPU: {d['simd_best']}; compiled: {', '.join(d['simd_compiled'])})"),
        ("cuda", _cuda_row(d)),
        ("transports", ", ".join(d["transports"])),
    ]
    try:
        import torch

        rows.append(("torch", torch.__version__))
    except ImportError:
        rows.append(("torch", "not installed (NumPy API only)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: `ringcc bench --help`
        from . import bench

        return bench.main(argv[1:])
    if argv[:1] == ["train"]:  # likewise: `ringcc train --help`
        from . import train_cli

        return train_cli.main(argv[1:])
    if argv[:1] == ["ps-server"]:
        from . import ps

        return ps.run_server_from_env(argv[1:])
    parser = argparse.ArgumentParser(prog="ringcc", description="ringcc collective communication")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print version and build options")
    p_info.set_defaults(func=_info)
    sub.add_parser("bench", help="benchmark collectives of torch.distributed backends (ringcc bench --help)")
    sub.add_parser("train", help="data-parallel training demo on synthetic data (ringcc train --help)")
    sub.add_parser("ps-server", help="run a parameter server of a job (ringcc ps-server --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
