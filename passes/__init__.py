"""slmopt passes: graph rewrites registered by name in slmopt.pass_base."""
