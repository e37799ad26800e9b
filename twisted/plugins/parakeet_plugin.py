from twisted.application.service import ServiceMaker

Parakeet = ServiceMaker("parakeet", "parakeet.server.tap", "Streaming speech recognition server.", "parakeet")
