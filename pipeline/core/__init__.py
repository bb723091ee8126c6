"""What every process shares and that depends on nothing else of Herald: settings, errors, the envelope and its grammars, ids, logs, metrics."""
