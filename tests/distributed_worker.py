"""One process of the distributed tests (tests/test_distributed.py): joins the process group the
environment describes (as under torchrun), quantizes a tiny model, and process 0 saves it."""
from __future__ import annotations

import json
import sys


def main(spec: dict) -> None:
    import torch

    import qcore
    from qcore.pipeline.distributed import init_from_env
    from qcore.plugin.errors import QcoreError
    from qcore.tiny import tiny_model

    rank, size = init_from_env()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model(spec["family"])
    ids = torch.randint(3, model.config.vocab_size, (spec["n"], 32), generator=torch.Generator().manual_seed(1))
    try:
        qcore.quantize(model, spec["method"], calibration=ids, **spec["options"])
    except QcoreError as exc:
        print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
        return
    if rank == 0:
        qcore.save(model, spec["out"])
    print(f"rank {rank}/{size} done", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
