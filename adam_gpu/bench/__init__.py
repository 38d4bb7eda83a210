"""``adam-gpu bench``: every adam-gpu backend against the framework optimizers, measured in one run.

cases.py (what is stepped), contenders.py (who steps it), timing.py (how it is timed), memory.py (how much
the input sets may fill), run.py (the loop that writes one Record per measurement), report.py (the Markdown
table and plot, from the JSON).
"""
