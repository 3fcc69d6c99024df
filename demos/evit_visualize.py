"""Draw which patches an EViT model keeps after each reorganising block (the paper's Figure 1).

Same as `vizoo visualize` (see `vizoo visualize -h`):

    python demos/evit_visualize.py evit_deit_small_patch16_224.r0p7_fuse cat.jpg --pretrained weights.pth
    python demos/evit_visualize.py --photos 4 --checkpoint runs/x/best.safetensors --keep-rate 0.5
"""
from __future__ import annotations

import sys

from vizoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
