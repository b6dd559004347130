"""Train a hydrahead classifier.

    torchrun --nproc-per-node 2 launch/train.py --config configs/quickstart.yaml
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        launch/train.py --config configs/resnet50_1m.yaml run.dir=/shared/runs/r50 train.steps=90000

Overrides are dotted ``key=value`` pairs applied after the YAML file; each value is read
as a YAML scalar (``false``, ``1e-3``, ``[0.9, 0.95]``). Rerunning the same command
continues the run from the newest checkpoint in ``run.dir/checkpoints`` that verifies.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record  # noqa: E402

from hydrahead.config import config_to_dict, describe_config, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description=__doc__,
        epilog="configuration keys (set them in the YAML file or as key=value):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (omit for the built-in defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. head.num_classes=100000"
    )
    return parser.parse_args(argv)


class AtomicErrorHandler(ErrorHandler):
    """torchrun's record of a failed worker's exception, written beside the error file and
    renamed into place. torchrun's agent parses a failed worker's error file as soon as it
    sees the failure; written in place, a worker stopped mid-write leaves it empty, and the
    agent itself dies on the parse instead of restarting the workers."""

    def record_exception(self, e: BaseException) -> None:
        path = self._get_error_file_path()
        if not path:
            return super().record_exception(e)
        message = {
            "message": f"{type(e).__name__}: {e}",
            "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))},
        }  # torchrun's format
        partial = f"{path}.partial"
        with open(partial, "w") as file:
            json.dump({"message": message}, file)
        os.replace(partial, path)


@functools.partial(record, error_handler=AtomicErrorHandler())
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0

    from hydrahead.distributed.setup import destroy_distributed, init_distributed
    from hydrahead.train.collector import startup_objects_frozen
    from hydrahead.train.trainer import Trainer

    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        # the imports out of the full collections' walk (train.gc_every 0 leaves the collector alone)
        with startup_objects_frozen(cfg.train.gc_every > 0):
            Trainer(cfg, env).train()
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
