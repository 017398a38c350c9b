import os
from pathlib import Path

import pytest

from pneumo.config import from_dict

# The real Kermany files live beside the checkout (../shared/data); PNEUMO_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KERMANY224 = SHARED_DATA / "kermany224"
FULLRES = SHARED_DATA / "kermany_fullres_sample"

needs_shared = pytest.mark.skipif(not KERMANY224.is_dir(), reason=f"real data not found at {SHARED_DATA}")


def tiny_raw(out_dir, **sections) -> dict:
    """A config small enough to train in about a second: 32x32 synthetic images, two blocks."""
    raw = {
        "seed": 0,
        "device": "cpu",
        # The decoded-image cache goes beside the run, never into the home folder of whoever runs the tests.
        "data": {"format": "synthetic", "image_size": 32, "cache_dir": str(Path(out_dir).parent / "cache"),
                 "synthetic": {"n_train": 96, "n_val": 48, "n_test": 48}},
        "model": {"channels": [8, 16], "stem_stride": 1},
        "train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, "patience": 0},
        "output": {"dir": str(out_dir)},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


@pytest.fixture
def tiny_config(tmp_path):
    def make(**sections):
        return from_dict(tiny_raw(tmp_path / "run", **sections))

    return make
