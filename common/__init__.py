"""disagg.common"""
