"""The web page and JSON API of `skinclf serve`, on loopback by default.

Imports every stage below except `training`. Entry points: `server.serve`, `routes.create_app`;
`classifier.Classifier` is the one thread that owns the engine.
"""
