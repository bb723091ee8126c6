"""What every process shares, depending on nothing else of Herald.

Settings, the error hierarchy, the envelope and its grammars, ids, frames, logs, metrics.
"""
