"""The built-in toy benchmark (docs/toy-suite.md): `world` (vocabulary, the world, example generators),
`checkers` (the toy-Lisp checker, registered explicitly with `checkers.register()`), `suite` (build, write and
check the suite; tokenizer training), `pool` (train the toy checkpoint pool for merge search), `commands`
(`ptm toy` / `python -m ptm.toy`)."""
