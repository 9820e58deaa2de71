"""raynas.search"""
