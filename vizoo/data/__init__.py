"""Datasets: bundled real data (no download at run time), ImageFolder and COCO-json readers.

- ``bundled``: raw arrays of scikit-learn's digits and scikit-image's photos (tests, calibration);
- ``digits``: the digits as a train/val dataset of 8-bit images (the engine's default data);
- ``folder``: a user's own images, one folder per class; unreadable files are skipped and counted;
- ``shapes``: procedural shapes on real photos, a COCO-format detection set generated from a seed;
- ``coco``: COCO-json detection reader (bad files reported, not fatal), box-aware transforms, collate;
- ``transforms``: preprocessing from a model's pretrained config through timm's factory;
- ``loaders``: datasets by name, and loaders whose order is fixed by (seed, epoch, position) so
  resumed and multi-process runs see exactly the batches of an unbroken single-process run.
"""
