"""raynas.train"""
