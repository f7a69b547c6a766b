"""Data: fetch HAM10000, prepare the lesion-grouped split, find images in a folder, decode them.

Imports only the ground floor. Entry points: `fetch.fetch_dataset`, `prepare.prepare_dataset`,
`layout` (where HAM10000, the split and the bundled model live), `walk.walk_images` (every file,
and every place that could not be read), `images.load_image` / `images.open_image` (decoding).
"""
