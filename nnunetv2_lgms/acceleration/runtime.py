"""(being filled)"""
