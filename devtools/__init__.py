"""Development and test tooling: embedded servers for `make dev` and the tests, never imported at run time."""
