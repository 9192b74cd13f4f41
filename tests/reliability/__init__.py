"""Reliability suite: bad inputs, faults and misuse a ward meets over months (issue 15)."""
