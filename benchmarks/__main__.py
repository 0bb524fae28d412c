"""`python -m benchmarks`: run the benchmark (benchmarks/run.py) and write its report."""

from benchmarks.run import main

raise SystemExit(main())
