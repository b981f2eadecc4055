"""CMA-ES merge search over a checkpoint pool (docs/search.md): `objective`, `space`, `cma` (the loop and its
resumable log), `pool` (the resident pool), `config` (SearchConfig), `study` (the whole study), `plots`,
`commands` (`ptm search`)."""
