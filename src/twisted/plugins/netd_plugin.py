from twisted.application.service import ServiceMaker

netd = ServiceMaker("netd", "netd.tap", "Many small network services from one YAML map.", "netd")
