"""The server processes: HTTP front end (OpenAI and native APIs), tokenizer and detokenizer, the
scheduler process, ZMQ IPC, metrics, and the launchers (`launch_server`, `launch_local`)."""
