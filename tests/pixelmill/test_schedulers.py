from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pixelmill.schedulers import KNOWN_SCHEDULERS, SCHEDULER_LABELS, canonical_scheduler


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        (None, None),
        ("", None),
        ("default", None),
        (" Default ", None),
        ("euler", "euler"),
        ("euler_a", "euler_a"),
        ("Euler a", "euler_a"),
        ("EULER_A", "euler_a"),
        ("ddim", "ddim"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("dpm++ 2m karras", "dpmpp_2m_karras"),
        ("pndm", "pndm"),
    ],
)
def test_spellings_map_to_one_name(spelling: str | None, canonical: str | None) -> None:
    assert canonical_scheduler(spelling) == canonical


def test_every_canonical_name_and_label_is_its_own_canonical_name() -> None:
    for name, label in SCHEDULER_LABELS.items():
        assert canonical_scheduler(name) == name
        assert canonical_scheduler(label) == name
    assert KNOWN_SCHEDULERS[0] == "default"
    assert KNOWN_SCHEDULERS[1:] == tuple(SCHEDULER_LABELS)


@pytest.mark.parametrize("name", ["euler_ancestral", "lms", "euler a karras"])
def test_unknown_name_lists_the_known_ones(name: str) -> None:
    with pytest.raises(ValueError) as err:
        canonical_scheduler(name)
    assert str(err.value) == (
        f"scheduler: unknown scheduler {name!r}; "
        "known: default, euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, pndm"
    )


def test_no_diffusers_import() -> None:
    # The producer imports this module; it must not pull in diffusers (or torch).
    code = (
        "import sys, pixelmill.schedulers; "
        "print('diffusers' in sys.modules, 'torch' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert result.stdout.strip() == "False False"
