"""Herald's library, one subpackage a concern (docs/design.md: "Layout").

`core` (settings, errors, the envelope, ids) depends on nothing else of Herald;
`store` (Redis) and `kafka` build on it; `archive`, `rules`, `ingest`, `dlq`,
`taskqueue` and `bridge` on those. Nothing here imports `web` or `tasks`, the
process roles that use it.
"""
