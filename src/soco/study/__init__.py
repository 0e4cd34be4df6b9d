"""What pretraining buys: every method's arm fine-tuned under one budget, several seeds, two readings, resumable.

`design` gathers the arms (each method declares its own, read through the registry) and names the budgets,
`runner` pretrains, exports and fine-tunes them (each piece resumes where it stopped), `report` reads the
finished runs into a table with seed spreads and a learning-curve plot. `soco study` (cli/study_command.py)
is the command; docs/study.md explains the design.
"""
