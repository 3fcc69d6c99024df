"""The QuEST benchmark (`vizoo quantize`): naive PTQ, Q-Diffusion-style PTQ, + TLA and full QuEST at
W8A8 / W4A8 / W4A4 on a 16x16 digit DDPM, mean ± std over seeds; writes quest.md / quest.json /
quest_samples.png to --out and, by default here, copies them to benchmarks/results/.

    python benchmarks/quest_benchmark.py --out runs/quest --seeds 0 1 2 --jobs 2

Every option of `vizoo quantize --help` applies; the run resumes where it stopped.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vizoo.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--results" not in argv:
        argv += ["--results", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(["quantize", *argv]))
