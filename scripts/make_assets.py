"""Regenerate the example inputs in assets/ (synthetic phantoms and a demo clip).

python scripts/make_assets.py [--out assets]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdcore.phantom import write_example_images, write_sweep_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets")
    args = parser.parse_args()
    for path in [*write_example_images(args.out), write_sweep_clip(args.out / "phantom_sweep.mp4")]:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
