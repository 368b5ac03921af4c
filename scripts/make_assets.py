"""Regenerate the example inputs in assets/ (synthetic phantoms and a demo clip).

python -m scripts.make_assets [--out assets]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdcore.app.phantom import write_example_images, write_sweep_clip
from kdcore.config import REPO_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets")
    args = parser.parse_args()
    for path in [*write_example_images(args.out), write_sweep_clip(args.out / "phantom_sweep.mp4")]:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
