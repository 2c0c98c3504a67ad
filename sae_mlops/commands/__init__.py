"""CLI command groups beyond quick/demo, one module each; importing a module registers its commands
on :data:`sae_mlops.cli.app`. Each module stays thin: parse options, make one library call."""
