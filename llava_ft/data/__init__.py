"""Data pipeline: formats -> encode (labels from spans) -> dataset (+cache) -> packing -> collate.

Import the pieces from their modules (`llava_ft.data.dataset.prepare_dataset`,
`llava_ft.data.collate.TextCollator`, ...); this package imports nothing eagerly so that importing one
module (e.g. images) does not pull in `datasets`.
"""
