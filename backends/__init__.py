"""slmopt backends: lowering of a Program to deployable artifacts."""
