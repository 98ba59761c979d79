"""``python -m brainage.simulate --root DIR ...``: write a simulated cohort."""

from brainage.simulate.cohort import main

main()
