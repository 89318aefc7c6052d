"""Checkpoint format, converter, loader, memory pool, tier cache, engine: plain data in, plain data out.

Never imports ``sllm.commands`` or ``sllm.server``, never imports rich or typer.
"""
