"""disagg.decode"""
