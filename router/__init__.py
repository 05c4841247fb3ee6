"""disagg.router"""
