"""Execution: the precision and backend per tower, backends behind one session interface."""
