from twisted.application.service import ServiceMaker

Parakeet = ServiceMaker("parakeet", "parakeet.tap", "Streaming speech recognition server.", "parakeet")
