"""The consensus-distance study (issue 16): generator, claim rules, report. See README.md."""
