"""`python -m tongue_nb` is the `tongue-nb` command."""
from tongue_nb.pipeline.cli import main

raise SystemExit(main())
