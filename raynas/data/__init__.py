"""raynas.data"""
