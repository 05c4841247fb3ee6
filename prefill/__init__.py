"""disagg.prefill"""
