"""slmopt passes: graph rewrites registered by name in slmopt.pipeline.pass_base."""
