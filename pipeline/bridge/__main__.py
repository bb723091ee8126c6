"""`python -m pipeline.bridge`: the bridge process (Procfile `bridge`)."""

from pipeline.bridge import main

main()
