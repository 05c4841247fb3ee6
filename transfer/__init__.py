"""disagg.transfer"""
