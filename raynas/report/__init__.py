"""raynas.report"""
