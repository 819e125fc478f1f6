"""Process runtime shared by every command: starting ranks (:mod:`.launch`) and stopping them (:mod:`.signals`).

Not a stage and no training code: ``training`` imports ``runtime`` (the stop request), never the other way.
"""
