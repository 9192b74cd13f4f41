"""Reliability suite (issue 15): faults, bad inputs and months of running, each against real parts."""
