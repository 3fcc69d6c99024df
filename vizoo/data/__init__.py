"""Datasets: bundled real data (no download at run time), ImageFolder and COCO-json readers."""
