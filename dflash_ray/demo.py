"""The small trained target + DFlash drafter pair that ships inside the package."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo_models"


def demo_pair() -> tuple[str, str]:
    """(target_dir, drafter_dir) of the shipped pair."""
    target, drafter = DEMO_DIR / "target", DEMO_DIR / "drafter"
    for d in (target, drafter):
        if not (d / "config.json").is_file():
            raise ValueError(
                f"the demo pair is not installed ({d} has no config.json); "
                "reproduce it with scripts/make_demo_pair.sh"
            )
    return str(target), str(drafter)
