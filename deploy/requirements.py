"""Print the serving requirements from pyproject.toml, with the onnxruntime flavour chosen.

    python3 deploy/requirements.py --onnxruntime "onnxruntime==1.31.1"              # CPU image
    python3 deploy/requirements.py --onnxruntime "onnxruntime-gpu[cuda,cudnn]==1.31.1"  # GPU image

pyproject.toml stays the one list of pinned serving dependencies; the image only swaps
onnxruntime-gpu for the build's choice. Standard library only: it runs before anything
is installed.
"""

import argparse
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(onnxruntime: str, pyproject: Path = PYPROJECT) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    kept = [d for d in dependencies if not d.startswith("onnxruntime")]
    return kept + [onnxruntime]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnxruntime", default="onnxruntime==1.31.1")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args()
    print("\n".join(requirements(args.onnxruntime, args.pyproject)))
