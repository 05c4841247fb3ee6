"""Process groups and collectives (`state.py`), rank processes and plan broadcast (`ranks.py`)."""
